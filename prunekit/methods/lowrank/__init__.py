"""Low-rank methods: weight matrices replaced by rank-k approximations."""
