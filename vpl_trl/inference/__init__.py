"""Serving a trained reward model: scoring texts for a user, sampling a policy, best-of-n per user, the sample CLI."""
