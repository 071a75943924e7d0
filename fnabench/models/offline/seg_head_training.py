"""Train an mmseg config with mmengine's Runner and keep its final checkpoint
(``python -m fnabench.models.offline.seg_head_training``).

This is how the offline head of ``mmseg:synthetic-dinov2s-linear`` was made (frozen offline:dinov2-s, a linear
head, the seeded synthetic set): mmseg's own training loop, seeded, on as many CPU threads as asked for.

    python -m fnabench.models.offline.seg_head_training synthetic-dinov2s-linear --work-dir runs/seg-head --threads 1 \\
        --out fnabench/models/offline/seg_head_configs/synthetic-dinov2s-linear.pth
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fnabench._errors import guarded
from fnabench.models.mmseg import _config, resolve_config


def train(config: str, work_dir: str, *, out: str | None = None, max_iters: int | None = None,
          threads: int | None = None) -> Path:
    """Run the config's training loop into ``work_dir``; copy the last checkpoint to ``out``; return its path."""
    from mmengine.runner import Runner


    if threads:
        torch.set_num_threads(threads)
    cfg = _config(resolve_config(config))
    cfg.work_dir = work_dir
    cfg.load_from = None
    if max_iters:
        cfg.train_cfg.max_iters = max_iters
        cfg.train_cfg.val_interval = max_iters
        cfg.default_hooks.checkpoint.interval = max_iters
        for scheduler in cfg.param_scheduler:
            scheduler.end = max_iters
    start = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.train()
    last = Path(work_dir) / (Path(work_dir) / "last_checkpoint").read_text().strip().split("/")[-1]
    runner.logger.info(f"fnabench: trained in {time.perf_counter() - start:.0f} s; checkpoint {last}")
    if not out:
        return last
    # the weights and the run's description only: mmengine's loop state (message_hub) would make torch >= 2.6
    # refuse the file under weights_only loading, which mmengine's own loader uses
    saved = torch.load(last, map_location="cpu", weights_only=False)  # written by this process just now
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": _plain(saved.get("meta", {})), "state_dict": saved["state_dict"]}, out)
    return Path(out)


def _plain(value):
    """``value`` with only types torch's weights_only loader accepts (dicts, lists, strings, numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fnabench.models.offline.seg_head_training",
                                description=__doc__.splitlines()[0])
    p.add_argument("config", help="an mmseg config: a path, or one shipped with fnabench")
    p.add_argument("--work-dir", required=True, help="mmengine's work folder (logs, checkpoints)")
    p.add_argument("--out", help="copy the final checkpoint here")
    p.add_argument("--max-iters", type=int, help="override the config's training length")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 leaves the other cores to others)")
    args = p.parse_args(argv)

    def run() -> int:
        print(train(args.config, args.work_dir, out=args.out, max_iters=args.max_iters, threads=args.threads))
        return 0

    return guarded("mmseg_train", run)


if __name__ == "__main__":
    sys.exit(main())
