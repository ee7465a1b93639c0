"""Watching a run: the metrics of a run as they arrive (the live view's state), the events rank 0
sends its launcher, and the status of any run directory (`flamingo status`)."""
