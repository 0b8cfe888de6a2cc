"""Training itself: the Trainer and its loop, data loaders, evaluation, optimizer and schedule, precision."""
