"""Model releases: the registry at the coordinator, the validation round trip, model cards."""
