"""What the command line runs: the demonstration networks."""
