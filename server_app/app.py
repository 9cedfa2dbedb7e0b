"""The ServerApp: validate the config, build the strategy, run, write results."""

from __future__ import annotations

from logging import ERROR, INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.allocator import keep_freed_memory
from common.config import ConfigError, load_run_config

from .checkpoint import check_compatible, checkpoint_path, read_checkpoint
from .engine.loop import Engine
from .engine.registry import HandshakeError
from .results import RunResults
from .strategies import build_strategy

# Every process that runs the app reuses freed memory (see common.allocator).
keep_freed_memory()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured algorithm for ``num-server-rounds`` rounds."""
    checkpoint = None
    try:
        cfg = load_run_config(context.run_config)
        engine = Engine(build_strategy(cfg), cfg)
        if cfg.resume_from:  # checked before anything is written
            path = checkpoint_path(cfg.resume_from, cfg.results_dir)
            checkpoint = read_checkpoint(path)
            check_compatible(checkpoint, cfg, path)
    except ConfigError as err:
        log(ERROR, "Invalid configuration: %s", err)
        raise
    if checkpoint is None:
        results = RunResults.create(cfg)
    else:
        results = RunResults.reopen(
            path.parent, cfg, checkpoint["metrics"], checkpoint["round"]
        )
    log(INFO, "Results directory: %s", results.path)
    log(INFO, "Live curves: tensorboard --logdir %s", results.path.parent)
    try:
        engine.start(grid, results, checkpoint)
    except HandshakeError as err:
        log(ERROR, "%s", err)
        raise
    finally:
        summary = results.finish()
        log(INFO, "Summary: %s", summary)
        log(INFO, "Disk use: %s", results.describe_disk_usage())
        log(INFO, "Results written to %s", results.path)
