"""vpl-trl: Variational Preference Learning (personalized reward models) on Hugging Face TRL."""

__version__ = "0.1.0"
