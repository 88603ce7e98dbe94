"""What the entry points share to run: checkpoints, callbacks, the config tree, loggers."""
