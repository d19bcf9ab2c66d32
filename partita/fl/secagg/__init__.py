"""Secure aggregation (Bonawitz et al. 2017): pairwise masks, Shamir shares, fixed-point ring."""
