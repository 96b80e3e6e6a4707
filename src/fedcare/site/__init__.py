"""The site agent: local data, local training, and what it sends back."""
