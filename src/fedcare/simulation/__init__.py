"""A whole federation on one machine, through the same round logic as the coordinator."""
