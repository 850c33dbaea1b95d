"""Mixture-of-experts methods: whole experts removed per layer."""
