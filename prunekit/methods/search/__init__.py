"""Search-based structural pruning: sub-networks of a weight-sharing super-network."""
