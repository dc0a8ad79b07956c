"""The model: workflows, orgs, names and the names of everything on the bus. Pure: no I/O."""
