"""The layer under every algorithm of the package: checks, rank-independent init, checkpoint and pretrained guards."""
