"""Evaluating reward models: accuracy metrics, latent diagnostics and plots, active queries, the CLI and the report."""
