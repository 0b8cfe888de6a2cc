"""The run directory: its name, its lock (one job at a time), its ledger, and one attempt's hold on it."""
