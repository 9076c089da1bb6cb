"""Where a run's records go: metrics.jsonl, TensorBoard (when installed and wanted) and the progress
bar. Only rank 0 writes; on other ranks every method does nothing."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_ppl")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after `step` (a resumed run logs them again) and a line cut off by a kill."""
    if path.is_file():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut off by a kill mid-write
                continue
        path.write_text("".join(line + "\n" for line in keep))


class Metrics:
    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, step: int, resumed: bool,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self.file = self.tb = self.bar = None
        if not enabled:
            return
        path = Path(out_dir) / "metrics.jsonl"
        if resumed:
            truncate_metrics(path, step)
        self.file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                self.tb = None
        if progress:
            self.bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)

    def log(self, rec: dict) -> None:
        """Write one record (a dict with "step") to the file and TensorBoard."""
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.tb:
            for k in rec:
                if k in SCALARS or "/" in k:  # "/": an evaluation task's metric, e.g. "colors/acc_norm"
                    self.tb.add_scalar(k, rec[k], rec["step"])

    def progress(self, rec: dict, last_val: dict) -> None:
        """Advance the bar one step, showing the latest figures."""
        if self.bar:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                 mfu=f"{100 * rec['mfu']:.1f}%",
                                 **({"val": f"{last_val['val_loss']:.4f}"} if last_val else {}))
            self.bar.update(1)

    def write(self, message: str) -> None:
        """A line for the person watching (above the progress bar)."""
        if self.enabled:
            (self.bar.write if self.bar else print)(message)

    def set_total(self, steps: int) -> None:
        if self.bar:
            self.bar.total = steps
            self.bar.refresh()

    def close(self) -> None:
        for sink in (self.bar, self.file, self.tb):
            if sink:
                sink.close()
