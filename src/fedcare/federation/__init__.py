"""The round logic shared by the simulation and the networked coordinator."""
