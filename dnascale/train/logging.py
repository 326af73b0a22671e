"""Run logging on rank 0: `metrics.jsonl` (always) and wandb (offline by default, no account needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, out_dir: str | Path, *, enabled: bool, wandb_mode: str, project: str, config: dict,
                 resume_step: int | None):
        self.enabled = enabled
        self.metrics_path = Path(out_dir) / "metrics.jsonl"
        self._wandb_run = None
        if not enabled:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb_run = wandb.init(
                project=project,
                mode=wandb_mode,
                dir=str(Path(out_dir)),
                config=config,
                resume="allow",
                id=_run_id(out_dir),
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )

    def _truncate_after(self, resume_step: int | None) -> None:
        """A resumed run rewrites the steps after its checkpoint, so drop the killed run's lines for them."""
        if not self.metrics_path.exists():
            return
        if resume_step is None:
            self.metrics_path.unlink()
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _run_id(out_dir: str | Path) -> str:
    """One wandb run per output directory, so a resumed run continues its curves."""
    import hashlib

    return hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]
