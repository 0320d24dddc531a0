"""Partial-based methods: train a subset of the weights (specification) or a reparameterised
update of them (reparameterization) that folds back in on merge."""
