"""The only place that writes to the terminal: one rich Console, tables, errors, JSON."""
